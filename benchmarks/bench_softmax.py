"""Same as `python -m online_softmax.bench`; kept here so benchmarks/ holds every benchmark entry point."""

from online_softmax.bench import main

if __name__ == "__main__":
    main()
