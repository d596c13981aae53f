"""`python -m vitexp.registry`: the tool is `vitexp.tools.registry`."""

from vitexp.tools.registry import main

if __name__ == "__main__":
    main()
