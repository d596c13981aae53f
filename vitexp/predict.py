"""`python -m vitexp.predict`: the tool is `vitexp.tools.predict`."""

from vitexp.tools.predict import main

if __name__ == "__main__":
    main()
