"""`python -m vitexp.evaluate`: the tool is `vitexp.tools.evaluate`."""

from vitexp.tools.evaluate import main

if __name__ == "__main__":
    main()
