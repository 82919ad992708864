from lexi_pl.cli import main

main()
