from esskit.cli import main

main()
