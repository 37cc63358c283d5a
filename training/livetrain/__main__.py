from livetrain.cli import main

main()
