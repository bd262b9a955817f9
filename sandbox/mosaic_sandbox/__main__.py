from mosaic_sandbox.cli import main

main()
