# A GKE cluster for tumorflow: a CPU pool for the pipeline steps, MLflow and serving; a GPU pool
# for training that scales from zero, tainted so only pods tolerating nvidia.com/gpu land on it
# (the compiled training task does, with runtime.gke_gpu_pool); Workload Identity service
# accounts for the pipeline and serving; the buckets. infra/README.md walks through it.

terraform {
  required_version = ">= 1.5"
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.0"
    }
  }
}

provider "google" {
  project = var.project_id
  region  = var.region
}

resource "google_container_cluster" "tumorflow" {
  #checkov:skip=CKV_GCP_65:RBAC through Google Groups needs the organisation's gke-security-groups group; a project without a Workspace organisation has none
  name     = "tumorflow"
  location = var.region
  # The pools below replace the default one.
  remove_default_node_pool = true
  initial_node_count       = 1
  node_locations           = var.zones
  deletion_protection      = true

  workload_identity_config {
    workload_pool = "${var.project_id}.svc.id.goog"
  }
  # The default pool's config (it is removed at once); the pools below set the same.
  node_config {
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }
  release_channel {
    channel = "REGULAR"
  }
  private_cluster_config {
    enable_private_nodes    = true
    enable_private_endpoint = false
    master_ipv4_cidr_block  = "172.16.0.0/28"
  }
  ip_allocation_policy {}
  network_policy {
    enabled = true
  }
  addons_config {
    # A multi-worker training on Kubeflow (a TFJob) mounts the bucket at /gcs/BUCKET as Vertex AI
    # and the KFP launcher name it (components/tfjob.py).
    gcs_fuse_csi_driver_config {
      enabled = true
    }
  }
  master_authorized_networks_config {}
  enable_shielded_nodes = true
  enable_intranode_visibility = true
  binary_authorization {
    evaluation_mode = "PROJECT_SINGLETON_POLICY_ENFORCE"
  }
  resource_labels = {
    app = "tumorflow"
  }
}

resource "google_service_account" "nodes" {
  account_id   = "tumorflow-nodes"
  display_name = "tumorflow GKE nodes"
}

resource "google_container_node_pool" "cpu" {
  name     = "cpu"
  cluster  = google_container_cluster.tumorflow.id
  location = var.region

  autoscaling {
    min_node_count = 1
    max_node_count = 4
  }
  management {
    auto_repair  = true
    auto_upgrade = true
  }
  node_config {
    machine_type    = "e2-standard-8"
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    image_type      = "COS_CONTAINERD"
    metadata = {
      disable-legacy-endpoints = "true"
    }
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}

resource "google_container_node_pool" "gpu" {
  name     = "gpu"
  cluster  = google_container_cluster.tumorflow.id
  location = var.region

  # From zero: a GPU node exists only while a training pod waits for or runs on it.
  initial_node_count = 0
  autoscaling {
    min_node_count = 0
    max_node_count = var.gpu_max_nodes
  }
  management {
    auto_repair  = true
    auto_upgrade = true
  }
  node_config {
    machine_type    = var.gpu_machine_type
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    image_type      = "COS_CONTAINERD"
    metadata = {
      disable-legacy-endpoints = "true"
    }
    guest_accelerator {
      type  = var.gpu_type
      count = var.gpus_per_node
      gpu_driver_installation_config {
        gpu_driver_version = "LATEST"
      }
    }
    # GKE sets cloud.google.com/gke-accelerator=<gpu_type> itself; the training task selects it.
    labels = {
      "tumorflow/pool" = "gpu"
    }
    taint {
      key    = "nvidia.com/gpu"
      value  = "present"
      effect = "NO_SCHEDULE"
    }
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}

# Google service accounts the Kubernetes service accounts act as (Workload Identity).
resource "google_service_account" "pipeline" {
  account_id   = "tumorflow-pipeline"
  display_name = "tumorflow pipeline steps and MLflow"
}

resource "google_service_account" "serving" {
  account_id   = "tumorflow-serving"
  display_name = "tumorflow TF Serving (read-only)"
}

resource "google_service_account_iam_member" "pipeline_workload_identity" {
  for_each           = toset(["kubeflow/pipeline-runner", "mlflow/mlflow"])
  service_account_id = google_service_account.pipeline.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[${each.value}]"
}

resource "google_service_account_iam_member" "serving_workload_identity" {
  service_account_id = google_service_account.serving.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[tumorflow/tumorflow-serving]"
}

resource "google_storage_bucket" "models" {
  #checkov:skip=CKV_GCP_62:access is recorded by Cloud Audit Logs (data access logs), not a second log bucket
  name                        = var.models_bucket
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  versioning {
    enabled = true
  }
}

resource "google_storage_bucket" "mlflow" {
  #checkov:skip=CKV_GCP_62:access is recorded by Cloud Audit Logs (data access logs), not a second log bucket
  name                        = var.mlflow_bucket
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  versioning {
    enabled = true
  }
}

resource "google_storage_bucket_iam_member" "pipeline_models" {
  bucket = google_storage_bucket.models.name
  role   = "roles/storage.objectAdmin"
  member = "serviceAccount:${google_service_account.pipeline.email}"
}

resource "google_storage_bucket_iam_member" "pipeline_mlflow" {
  bucket = google_storage_bucket.mlflow.name
  role   = "roles/storage.objectAdmin"
  member = "serviceAccount:${google_service_account.pipeline.email}"
}

resource "google_storage_bucket_iam_member" "serving_models" {
  bucket = google_storage_bucket.models.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.serving.email}"
}
