from lit_qlp.cli import main

main()
