"""Translation between the original ``model.params`` schedule keys and the diffusers scheduler config.

The config of the ldm_compat schedulers speaks diffusers where the meaning is the same, so that stock diffusers
schedulers can be built from it with ``from_config``:

====================  ===============================  ==============================================
original key          diffusers config key             note
====================  ===============================  ==============================================
``timesteps``         ``num_train_timesteps``          ``len(given_betas)`` when ``given_betas`` is set
``linear_start``      ``beta_start``
``linear_end``        ``beta_end``
``beta_schedule``     ``beta_schedule`` (renamed) and  LDM ``linear`` → ``scaled_linear``,
                      ``ldm_beta_schedule`` (verbatim)  ``sqrt_linear`` → ``linear``, ``cosine`` →
                                                       ``squaredcos_cap_v2``
``given_betas``       ``trained_betas``                also used when diffusers cannot express the
                                                       schedule (``sqrt``, ``cosine`` with s ≠ 0.008)
``parameterization``  ``prediction_type``              eps → epsilon, x0 → sample, v → v_prediction
``clip_denoised``     ``clip_sample``                  (``clip_sample_range`` 1.0)
``cosine_s``          ``cosine_s``                     LDM only
``v_posterior``       ``v_posterior``                  LDM only
``log_every_t``       ``log_every_t``                  LDM only
====================  ===============================  ==============================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .schedule import LDM_BETA_SCHEDULES, check_betas, make_beta_schedule

# original parameterization -> diffusers prediction_type
PREDICTION_TYPE_OF_PARAMETERIZATION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
PARAMETERIZATION_OF_PREDICTION_TYPE = {v: k for k, v in PREDICTION_TYPE_OF_PARAMETERIZATION.items()}

# original beta_schedule -> the diffusers name with the same formula (the naming trap: "linear" differs)
DIFFUSERS_OF_LDM_SCHEDULE = {
    "linear": "scaled_linear",
    "sqrt_linear": "linear",
    "cosine": "squaredcos_cap_v2",
    "squaredcos_cap_v2": "squaredcos_cap_v2",
    # no diffusers formula: always materialised as trained_betas; the name is only nominal
    "sqrt": "linear",
}
# diffusers beta_schedule -> the original schedule it means (when no ldm_beta_schedule says otherwise)
LDM_OF_DIFFUSERS_SCHEDULE = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "cosine"}

# diffusers hard-codes the cosine offset of squaredcos_cap_v2
DIFFUSERS_COSINE_S = 0.008

# model.params keys read by from_ldm_config, with the original DDPM defaults
LDM_SCHEDULE_DEFAULTS = {
    "timesteps": 1000,
    "beta_schedule": "linear",
    "linear_start": 1e-4,
    "linear_end": 2e-2,
    "cosine_s": 8e-3,
    "given_betas": None,
    "v_posterior": 0.0,
    "parameterization": "eps",
    "clip_denoised": True,
    "log_every_t": 100,
}


def diffusers_can_express(ldm_beta_schedule: str, cosine_s: float) -> bool:
    """Whether a stock diffusers ``beta_schedule`` has the same formula as this original schedule."""
    if ldm_beta_schedule in ("linear", "sqrt_linear", "squaredcos_cap_v2"):
        return True
    return ldm_beta_schedule == "cosine" and float(cosine_s) == DIFFUSERS_COSINE_S


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PARAMETERIZATION_OF_PREDICTION_TYPE:
        raise ValueError(
            f"prediction_type={prediction_type!r}: expected one of {sorted(PARAMETERIZATION_OF_PREDICTION_TYPE)}"
        )
    return prediction_type


def resolve_schedule(
    *,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Sequence[float] | np.ndarray | None,
    cosine_s: float,
    ldm_beta_schedule: str | None,
    beta_schedule_is_default: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Float64 betas for a scheduler config, and the normalised schedule keys to register back into the config.

    Rules: ``ldm_beta_schedule`` (the original name), when set, decides the formula; ``beta_schedule`` is then its
    diffusers name (an explicit contradicting value raises), and ``trained_betas`` holds the materialised float64
    betas whenever diffusers cannot express the schedule (given ones must equal them). Without
    ``ldm_beta_schedule``, ``trained_betas`` are the original's ``given_betas`` if set, otherwise ``beta_schedule``
    (diffusers meaning) names the formula.
    """
    num_train_timesteps = int(num_train_timesteps)
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps={num_train_timesteps}: expected a positive integer")
    if ldm_beta_schedule is None and trained_betas is None:
        if beta_schedule not in LDM_OF_DIFFUSERS_SCHEDULE:
            raise ValueError(
                f"beta_schedule={beta_schedule!r}: expected one of {sorted(LDM_OF_DIFFUSERS_SCHEDULE)} (diffusers "
                "names), or pass trained_betas / ldm_beta_schedule"
            )
        ldm_name = LDM_OF_DIFFUSERS_SCHEDULE[beta_schedule]
        if ldm_name == "cosine" and float(cosine_s) != DIFFUSERS_COSINE_S:
            raise ValueError(
                f"cosine_s={cosine_s}: beta_schedule='squaredcos_cap_v2' has the fixed offset 0.008; for another "
                "offset pass ldm_beta_schedule='cosine' (LDMDDPMScheduler.from_ldm_config does)"
            )
        betas = make_beta_schedule(ldm_name, num_train_timesteps, beta_start, beta_end, cosine_s)
        return check_betas(betas, "beta_schedule"), {}

    if ldm_beta_schedule is None:  # the original's given_betas
        betas = check_betas(trained_betas, "trained_betas")
        _check_length(betas, num_train_timesteps)
        return betas, {"trained_betas": [float(b) for b in betas]}

    if ldm_beta_schedule not in LDM_BETA_SCHEDULES:
        raise ValueError(f"ldm_beta_schedule={ldm_beta_schedule!r}: expected one of {LDM_BETA_SCHEDULES} or None")
    nominal = DIFFUSERS_OF_LDM_SCHEDULE[ldm_beta_schedule]
    if beta_schedule != nominal and not beta_schedule_is_default:
        raise ValueError(
            f"beta_schedule={beta_schedule!r} contradicts ldm_beta_schedule={ldm_beta_schedule!r} (its diffusers name "
            f"is {nominal!r}; LDM 'linear' is diffusers 'scaled_linear')"
        )
    betas = check_betas(
        make_beta_schedule(ldm_beta_schedule, num_train_timesteps, beta_start, beta_end, cosine_s), "beta_schedule"
    )
    if trained_betas is not None:
        given = check_betas(trained_betas, "trained_betas")
        _check_length(given, num_train_timesteps)
        if not np.array_equal(given, betas):
            raise ValueError(
                f"trained_betas differ from ldm_beta_schedule={ldm_beta_schedule!r} with these parameters; set "
                "ldm_beta_schedule=None to use them as the original's given_betas"
            )
    normalised: dict[str, Any] = {"beta_schedule": nominal}
    if diffusers_can_express(ldm_beta_schedule, cosine_s):
        normalised["trained_betas"] = None if trained_betas is None else [float(b) for b in betas]
    else:
        normalised["trained_betas"] = [float(b) for b in betas]
    return betas, normalised


def _check_length(betas: np.ndarray, num_train_timesteps: int) -> None:
    if betas.shape[0] != num_train_timesteps:
        raise ValueError(
            f"trained_betas has {betas.shape[0]} entries but num_train_timesteps={num_train_timesteps}; they must match"
        )


def _plain(params: Mapping) -> dict:
    # OmegaConf DictConfig/ListConfig → plain containers (given_betas may be a ListConfig from YAML)
    from ldm_compat.config import to_plain

    return dict(to_plain(params))


def ldm_params_to_config(params: Mapping) -> dict[str, Any]:
    """Scheduler config keys from the original ``model.params`` (other keys are ignored; missing keys take the
    original ``DDPM`` defaults; a value of ``None`` counts as missing)."""
    if not isinstance(params, Mapping):
        raise ValueError(f"params: expected the model.params mapping of an original config, got {type(params)}")
    params = _plain(params)
    p = {k: (params[k] if params.get(k) is not None else default) for k, default in LDM_SCHEDULE_DEFAULTS.items()}

    parameterization = p["parameterization"]
    if parameterization not in PREDICTION_TYPE_OF_PARAMETERIZATION:
        raise ValueError(
            f"parameterization={parameterization!r}: expected one of {sorted(PREDICTION_TYPE_OF_PARAMETERIZATION)}"
        )
    config: dict[str, Any] = {
        "beta_start": float(p["linear_start"]),
        "beta_end": float(p["linear_end"]),
        "cosine_s": float(p["cosine_s"]),
        "v_posterior": float(p["v_posterior"]),
        "prediction_type": PREDICTION_TYPE_OF_PARAMETERIZATION[parameterization],
        "clip_sample": bool(p["clip_denoised"]),
        "clip_sample_range": 1.0,
        "log_every_t": int(p["log_every_t"]),
    }
    if p["given_betas"] is not None:
        betas = check_betas(p["given_betas"], "given_betas")
        if params.get("timesteps") is not None and int(params["timesteps"]) != betas.shape[0]:
            raise ValueError(
                f"given_betas has {betas.shape[0]} entries but timesteps={params['timesteps']}; they must match"
            )
        config.update(
            num_train_timesteps=int(betas.shape[0]),
            trained_betas=[float(b) for b in betas],
            beta_schedule=DIFFUSERS_OF_LDM_SCHEDULE.get(p["beta_schedule"], "linear"),
            ldm_beta_schedule=None,
        )
        return config
    schedule = p["beta_schedule"]
    if schedule not in LDM_BETA_SCHEDULES:
        raise ValueError(f"beta_schedule={schedule!r}: expected one of {LDM_BETA_SCHEDULES} (original names)")
    config.update(
        num_train_timesteps=int(p["timesteps"]),
        beta_schedule=DIFFUSERS_OF_LDM_SCHEDULE[schedule],
        ldm_beta_schedule=schedule,
        trained_betas=None,  # filled in by the scheduler when diffusers cannot express the schedule
    )
    return config


def config_to_ldm_params(config: Mapping) -> dict[str, Any]:
    """The original ``model.params`` schedule keys for a scheduler config (the inverse of ``ldm_params_to_config``).

    Returns ``timesteps, beta_schedule, linear_start, linear_end, cosine_s, [given_betas], v_posterior,
    parameterization, clip_denoised, log_every_t`` as plain Python values, ready for a YAML file. With
    ``rescale_betas_zero_snr`` they describe the schedule before rescaling (the original has no such option).
    """
    ldm_schedule = config.get("ldm_beta_schedule")
    trained = config.get("trained_betas")
    if ldm_schedule is None and trained is None:
        ldm_schedule = LDM_OF_DIFFUSERS_SCHEDULE[config["beta_schedule"]]
    clip_sample = bool(config.get("clip_sample", True))
    if config.get("thresholding"):
        raise ValueError(
            "thresholding=True: the original has no dynamic thresholding (clip_denoised clamps to [-1, 1]); use a "
            "scheduler with thresholding=False for the original config"
        )
    if clip_sample and float(config.get("clip_sample_range", 1.0)) != 1.0:
        raise ValueError(
            f"clip_sample_range={config['clip_sample_range']}: the original clips to [-1, 1] only (clip_denoised)"
        )
    params: dict[str, Any] = {
        "timesteps": int(config["num_train_timesteps"]),
        "beta_schedule": ldm_schedule if ldm_schedule is not None else "linear",
        "linear_start": float(config["beta_start"]),
        "linear_end": float(config["beta_end"]),
        "cosine_s": float(config.get("cosine_s", LDM_SCHEDULE_DEFAULTS["cosine_s"])),
    }
    if ldm_schedule is None:
        params["given_betas"] = [float(b) for b in trained]
    params.update(
        v_posterior=float(config.get("v_posterior", 0.0)),
        parameterization=PARAMETERIZATION_OF_PREDICTION_TYPE[check_prediction_type(config["prediction_type"])],
        clip_denoised=clip_sample,
        log_every_t=int(config.get("log_every_t", LDM_SCHEDULE_DEFAULTS["log_every_t"])),
    )
    return params
