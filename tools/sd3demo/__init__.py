"""The demo model's tooling, outside the runtime package: the server only loads the weights it produced
(``src/sd3serve/models/demo/``).

- ``world``: the shapes world (pictures, captions, held-out triples);
- ``judge``: reads a picture's attributes back by plain image analysis (``bench/demo_quality.py``);
- ``tokenization``: the one pair of tokenizer builders (characters, plus one token per vocabulary word);
- ``tiny``: small SD3-architecture models with random weights (test fixtures, benchmarks);
- ``train``: trains the demo model: ``PYTHONPATH=tools python -m sd3demo.train --out DIR`` (or ``make train-demo``).
"""
