"""`python -m vitexp.explain`: the tool is `vitexp.tools.explain`."""

from vitexp.tools.explain import main

if __name__ == "__main__":
    main()
