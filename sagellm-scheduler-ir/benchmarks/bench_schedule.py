"""asv: schedule() and build_plan() time for 256 requests, FCFS vs the naive baseline."""

from sagellm.scheduler_ir.bench import measure


class ScheduleAndBuild256:
    """One seeded measurement per asv run; every figure is tracked, ratios included."""

    timeout = 120

    def setup_cache(self):
        return measure(num_requests=256, repeats=30)

    def track_fcfs_decode_schedule_us(self, r):
        return r["fcfs_decode_schedule_us"]

    def track_fcfs_decode_build_us(self, r):
        return r["fcfs_decode_build_us"]

    def track_fcfs_prefill_schedule_us(self, r):
        return r["fcfs_prefill_schedule_us"]

    def track_fcfs_prefill_build_us(self, r):
        return r["fcfs_prefill_build_us"]

    def track_naive_decode_schedule_us(self, r):
        return r["naive_decode_schedule_us"]

    def track_decode_schedule_speedup_vs_naive(self, r):
        return r["decode_schedule_speedup"]

    def track_decode_build_speedup_vs_naive(self, r):
        return r["decode_build_speedup"]

    def track_prefill_schedule_speedup_vs_naive(self, r):
        return r["prefill_schedule_speedup"]

    track_fcfs_decode_schedule_us.unit = "us"
    track_fcfs_decode_build_us.unit = "us"
    track_fcfs_prefill_schedule_us.unit = "us"
    track_fcfs_prefill_build_us.unit = "us"
    track_naive_decode_schedule_us.unit = "us"
    track_decode_schedule_speedup_vs_naive.unit = "x"
    track_decode_build_speedup_vs_naive.unit = "x"
    track_prefill_schedule_speedup_vs_naive.unit = "x"


class ScheduleStep:
    """Wall time of one steady-state decode step (schedule + build + update) for 256 requests."""

    def setup(self):
        from sagellm.scheduler_ir.bench import _fcfs, make_workload

        self.sched = _fcfs(256 * 40, 16, 256 * 512, 256)
        for r in make_workload(256):
            self.sched.add_request(r)
        out = self.sched.schedule()
        self.sched.update_from_output(out, {c.request_id: [1] for c in out.chunks if c.sample})

    def time_decode_step(self):
        out = self.sched.schedule()
        self.sched.build_plan(out)
        self.sched.update_from_output(out, {c.request_id: [1] for c in out.chunks if c.sample})
