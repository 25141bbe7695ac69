variable "project_id" {
  description = "The GCP project everything is created in."
  type        = string
}

variable "region" {
  description = "Region of the cluster and the buckets."
  type        = string
  default     = "europe-west4"
}

variable "zones" {
  description = "Zones of the node pools (the GPU type must exist in them)."
  type        = list(string)
  default     = ["europe-west4-a"]
}

variable "gpu_type" {
  description = "GKE accelerator of the GPU pool; runtime.accelerator_type names the same GPU (nvidia-l4 = NVIDIA_L4)."
  type        = string
  default     = "nvidia-l4"
}

variable "gpu_machine_type" {
  description = "Machine type of the GPU pool (runtime.machine_type for Vertex AI)."
  type        = string
  default     = "g2-standard-8"
}

variable "gpus_per_node" {
  description = "GPUs per GPU node (runtime.accelerator_count)."
  type        = number
  default     = 1
}

variable "gpu_max_nodes" {
  description = "Most GPU nodes the autoscaler may start; the pool scales down to zero."
  type        = number
  default     = 4
}

variable "models_bucket" {
  description = "Bucket of models, checkpoints and the pipeline root (runtime.bucket without gs://)."
  type        = string
}

variable "mlflow_bucket" {
  description = "Bucket of MLflow's artifact root."
  type        = string
}
