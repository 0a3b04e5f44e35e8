from distill.bench.cli import main

main()
