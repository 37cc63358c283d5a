from livetrain.tools.cli import main

main()
