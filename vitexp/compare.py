"""`python -m vitexp.compare`: the tool is `vitexp.tools.compare`."""

from vitexp.tools.compare import main

if __name__ == "__main__":
    main()
