"""`python -m vitexp.bench`: the tool is `vitexp.tools.bench`."""

from vitexp.tools.bench import main

if __name__ == "__main__":
    main()
