output "cluster" {
  description = "gcloud container clusters get-credentials <this> --region <region>"
  value       = google_container_cluster.tumorflow.name
}

output "pipeline_service_account" {
  description = "Annotate the pipeline runner's and MLflow's Kubernetes service accounts with this."
  value       = google_service_account.pipeline.email
}

output "serving_service_account" {
  description = "infra/k8s/base/serviceaccount.yaml's iam.gke.io/gcp-service-account."
  value       = google_service_account.serving.email
}

output "runtime_bucket" {
  description = "runtime.bucket of the pipeline config."
  value       = "gs://${google_storage_bucket.models.name}"
}

output "mlflow_artifact_root" {
  description = "MLflow's --default-artifact-root (infra/k8s/mlflow/settings.yaml)."
  value       = "gs://${google_storage_bucket.mlflow.name}/artifacts"
}
