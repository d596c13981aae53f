"""`python -m vitexp.speedrun`: the tool is `vitexp.tools.speedrun`."""

from vitexp.tools.speedrun import main

if __name__ == "__main__":
    main()
