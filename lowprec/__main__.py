"""``python -m lowprec``: print the format table."""

from .formats import format_table

__all__: list[str] = []

if __name__ == "__main__":
    print(format_table())
