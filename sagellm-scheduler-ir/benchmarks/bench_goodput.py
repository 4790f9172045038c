"""asv: goodput of each policy vs FCFS on the seeded mixed workload, and IR build time of
256 requests per policy."""

from sagellm.scheduler_ir.goodput import POLICY_OPTIONS, compare, make_workload, measure_build


class Goodput:
    """Simulated goodput (requests meeting TTFT and TPOT per second), a=15 ms, b=1.5 ms/token;
    every policy replays the same seeded workload in one run, reported as ratios to FCFS."""

    timeout = 120
    params = [[1.0, 1.4]]
    param_names = ["rate"]

    def setup_cache(self):
        return {
            rate: compare(make_workload(200, seed=0, rate=rate), a=0.015, b=0.0015)
            for rate in (1.0, 1.4)
        }

    def _ratio(self, results, rate, policy):
        r = results[rate]
        return r[policy].goodput / r["fcfs"].goodput

    def track_fcfs_goodput(self, results, rate):
        return results[rate]["fcfs"].goodput

    def track_priority_goodput_vs_fcfs(self, results, rate):
        return self._ratio(results, rate, "priority")

    def track_fair_goodput_vs_fcfs(self, results, rate):
        return self._ratio(results, rate, "fair")

    def track_slo_goodput_vs_fcfs(self, results, rate):
        return self._ratio(results, rate, "slo")

    def track_adaptive_goodput_vs_fcfs(self, results, rate):
        return self._ratio(results, rate, "adaptive")

    def track_pd_goodput_vs_fcfs(self, results, rate):
        return self._ratio(results, rate, "pd")

    track_fcfs_goodput.unit = "req/s"
    track_priority_goodput_vs_fcfs.unit = "x"
    track_fair_goodput_vs_fcfs.unit = "x"
    track_slo_goodput_vs_fcfs.unit = "x"
    track_adaptive_goodput_vs_fcfs.unit = "x"
    track_pd_goodput_vs_fcfs.unit = "x"


class PolicyBuild256:
    """Median schedule() and build_plan() microseconds per policy, 256 requests."""

    timeout = 120
    params = [list(POLICY_OPTIONS)]
    param_names = ["policy"]

    def setup_cache(self):
        return measure_build(256, repeats=15)

    def track_decode_build_us(self, r, policy):
        return r[policy]["decode_build_us"]

    def track_prefill_build_us(self, r, policy):
        return r[policy]["prefill_build_us"]

    def track_decode_schedule_us(self, r, policy):
        return r[policy]["decode_schedule_us"]

    def track_prefill_schedule_us(self, r, policy):
        return r[policy]["prefill_schedule_us"]

    def track_decode_schedule_vs_fcfs(self, r, policy):
        return r[policy]["decode_schedule_us"] / r["fcfs"]["decode_schedule_us"]

    track_decode_build_us.unit = "us"
    track_prefill_build_us.unit = "us"
    track_decode_schedule_us.unit = "us"
    track_prefill_schedule_us.unit = "us"
    track_decode_schedule_vs_fcfs.unit = "x"
