from consistency_lens.cli import main

main()
