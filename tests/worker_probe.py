"""A user's own vLLM worker extension (`--worker-extension-cls worker_probe.Probe`),
served beside livetrain's to check that both reach the worker."""

from __future__ import annotations


class Probe:
    def probe_linear_kernels(self) -> list[str]:
        """The names of the CPU kernels this worker's linear layers call."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        return sorted(
            {
                getattr(m.cpu_linear, "__name__", "?")
                for m in model.modules()
                if hasattr(m, "cpu_linear")
            }
        )
