"""Shared pieces of the example scripts: a byte-level tokenizer, a generated
corpus, GPT and BERT datasets, and a loader that shards batches by rank.

The scripts import it as ``common`` (they put ``examples/`` on the path, not the
repository root, so that the installed rannc_py is the one they use); the tests
import it as ``examples.common``. Its modules import each other relatively, so
both work."""
