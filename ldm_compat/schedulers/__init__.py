"""Schedulers: the original DDPM schedule and samplers as diffusers ``SchedulerMixin`` classes."""
