"""asv benchmarks of sagellm.quantization: replace with the package's measurements, side by side with
its anchor in the same class (ratios through track_* methods)."""

from sagellm.quantization.config import QuantizationConfig


class ConfigSuite:
    def setup(self) -> None:
        self.options: dict[str, object] = {}

    def time_validate_config(self) -> None:
        QuantizationConfig(**self.options)
