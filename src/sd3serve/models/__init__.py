"""The model that ships with sd3serve: the embedded demo model's weights (``demo/``). The tooling that trained
them (world, judge, trainer, tiny-model builders) is not part of the package: see ``tools/sd3demo``."""
