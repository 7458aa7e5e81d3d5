from kvzip.cli.app import main

main()
