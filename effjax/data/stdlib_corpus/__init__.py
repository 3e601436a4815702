"""The Python standard library as a tensorflow-datasets dataset (see stdlib_corpus_dataset_builder).

The builder lives in its own package folder because tensorflow-datasets looks for metadata files
(checksums, citations) next to the module that defines a builder.
"""
