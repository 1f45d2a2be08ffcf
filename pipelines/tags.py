"""MLflow tag names shared by the controller (which reads them) and the driver (which writes)."""

JOB_ID = "selfsup.job_id"
ERROR = "selfsup.error"
# Whose failure it was: "user" (spec, code, data or a diverging loss: retrying cannot help) or
# "infra" (a worker, node or service died: the controller retries from the checkpoint).
ERROR_KIND = "selfsup.error_kind"
USER_ERROR, INFRA_ERROR = "user", "infra"
MODEL_NAME = "selfsup.model_name"
MODEL_VERSION = "selfsup.model_version"
MODEL_ALIAS = "selfsup.model_alias"
# Evaluation: the split every protocol used (recipe and digest of its indices), and why
# label-based evaluation was skipped when it was (a dataset without labels).
SPLIT_TEST_FRACTION = "selfsup.split.test_fraction"
SPLIT_SEED = "selfsup.split.seed"
SPLIT_DIGEST = "selfsup.split.digest"
EVAL_SKIPPED = "selfsup.eval.skipped"
# Registered versions: where the code came from, what data shape the encoder takes, and what
# an evaluation run evaluated.
CODE_VERSION = "selfsup.code_version"
INPUT_SHAPE = "selfsup.input_shape"
TRAIN_SEED = "selfsup.train_seed"
RUN_KIND = "selfsup.kind"
