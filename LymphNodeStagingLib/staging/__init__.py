"""The clinical vocabulary: the 17 stations, the N-staging rule sets and the result of a case."""
