"""Developer tools: the copy check of remote_scripts/ and the tiny model folders of the tests and benchmarks."""
