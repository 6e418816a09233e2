from xenlike.cli import main

main()
