"""Under mutmut (``make mutate``): which of the tests that reach a mutant's function may run for it.

mutmut records, in one run of the selection, every test that reaches each function in its own process, and runs
those tests for each mutant of the function. A live server's background loops (webhook sender, housekeeping,
heartbeat) and its middleware are reached by every test that starts one, so a surviving mutant there would rerun
most of the suite. Here each area keeps its own tests: a mutant is run against the tests that reach its function
*and* lie under one of its area's paths (the first prefix of ``SCOPES`` that its module starts with). A mutant none
of whose tests is in its area is reported "no tests" (pytest's exit code 5), never killed by an unrelated test.
"""

from __future__ import annotations

ISOLATION = "tests/isolation/"
STORE_API = ("tests/api/test_idempotency.py", "tests/api/test_money_truth.py", "tests/api/test_cancel.py",
             "tests/api/test_v2.py", "tests/api/test_events.py", "tests/api/test_security.py",
             "tests/api/test_edges.py", "tests/api/test_webhooks.py", "tests/api/test_webhook_delivery.py",
             "tests/api/test_admin_spec.py")  # fmt: skip
MIDDLEWARE = ("tests/api/test_hardening.py", "tests/api/test_edges.py", "tests/api/test_security.py",
              "tests/api/test_streams_limits.py", "tests/api/test_routes.py", "tests/api/test_serving.py",
              "tests/api/test_heartbeat.py", "tests/api/test_flood.py", "tests/api/test_schema_limits.py",
              "tests/api/test_middleware_spec.py")  # fmt: skip
# The generation path itself, through its v1 and v2 routes (the OpenAI and img2img routes, the schemas and the
# middleware reach it too, but only on the way to their own checks).
SERVICE = ("tests/api/test_one_path.py", "tests/api/test_v2.py", "tests/api/test_idempotency.py",
           "tests/api/test_cancel.py", "tests/api/test_money_truth.py", "tests/api/test_serving.py",
           "tests/api/test_events.py", "tests/api/test_webhooks.py", "tests/api/test_edges.py",
           "tests/api/test_streams_limits.py", "tests/api/test_admin_spec.py",
           "tests/api/test_service_spec.py", "tests/api/test_loras.py", "tests/api/test_img2img.py")  # fmt: skip
OPENAI = ("tests/api/test_openai.py", "tests/api/test_loras.py", "tests/api/test_img2img.py", "tests/api/test_edges.py",
          "tests/api/test_schema_limits.py", "tests/api/test_openai_schemas_spec.py")  # fmt: skip

SCOPES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sd3serve.ledger.", ("tests/ledger/", ISOLATION, *STORE_API, "tests/test_faults.py",
                          "tests/test_ray_dispatch.py")),
    ("sd3serve.service.webhook_delivery", ("tests/api/test_webhook", ISOLATION)),
    ("sd3serve.service.", (*SERVICE, ISOLATION, "tests/test_faults.py")),
    ("sd3serve.api.routes.", ("tests/api/", ISOLATION)),
    ("sd3serve.api.middleware", (*MIDDLEWARE, ISOLATION)),
    ("sd3serve.api.openai_schemas", OPENAI),
    ("sd3serve.engine.", ("tests/engine/", "tests/api/test_one_path.py", "tests/api/test_serving.py")),
    ("sd3serve.scaleout", ("tests/",)),
)


def mutant_module(mutant_under_test: str) -> str | None:
    """``sd3serve.ledger.credits`` for ``sd3serve.ledger.credits.xǁCreditStoreǁhold__mutmut_3``; None for mutmut's
    other modes ("", "stats", "fail", "list_all_tests", ...)."""
    module, _, name = mutant_under_test.rpartition(".")
    return module if "__mutmut_" in name else None


def in_scope(module: str, test_path: str) -> bool:
    """Whether the test at ``test_path`` (relative to the project root) may kill a mutant of ``module``."""
    for prefix, paths in SCOPES:
        if module.startswith(prefix):
            return test_path.startswith(paths)
    return True
