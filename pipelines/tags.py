"""MLflow tag names shared by the controller (which reads them) and the driver (which writes)."""

JOB_ID = "selfsup.job_id"
ERROR = "selfsup.error"
MODEL_NAME = "selfsup.model_name"
MODEL_VERSION = "selfsup.model_version"
MODEL_ALIAS = "selfsup.model_alias"
