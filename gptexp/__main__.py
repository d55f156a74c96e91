from gptexp.train import main

main()
