"""asv benchmarks of {{import}}: replace with the package's measurements, side by side with
its anchor in the same class (ratios through track_* methods)."""

from {{import}}.config import {{Class}}Config


class ConfigSuite:
    def setup(self) -> None:
        self.options: dict[str, object] = {}

    def time_validate_config(self) -> None:
        {{Class}}Config(**self.options)
