"""asv benchmarks of sagellm.sparsity: replace with the package's measurements, side by side with
its anchor in the same class (ratios through track_* methods)."""

from sagellm.sparsity.config import SparsityConfig


class ConfigSuite:
    def setup(self) -> None:
        self.options: dict[str, object] = {}

    def time_validate_config(self) -> None:
        SparsityConfig(**self.options)
