"""``python -m lowprec``: print the format table."""

from .formats import format_table

if __name__ == "__main__":
    print(format_table())
