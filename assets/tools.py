"""The resources an asset works with, bundled (:class:`Tools`), and the DVC versions of its datasets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from resources.dvc import DvcResource
from resources.launcher import K8sLauncher, TrainingLauncher
from resources.mlflow_tracking import MlflowResource
from resources.storage import Dataset, LocalStorage, S3Storage, StorageResource


@dataclass
class Tools:
    """The resources an asset works with, bundled: storage, MLflow, DVC and the launcher."""

    storage: StorageResource
    mlflow: MlflowResource | None = None
    dvc: DvcResource | None = None
    launcher: TrainingLauncher | None = None

    def launcher_is_remote(self) -> bool:
        """Whether training runs elsewhere (a Kubernetes pod) and must read and write S3."""
        remote = isinstance(self.launcher, K8sLauncher)
        if remote and not isinstance(self.storage, S3Storage):
            raise ValueError("the Kubernetes launcher needs S3 storage (BLIP_OPS_STORAGE=s3)")
        return remote

    def version(self, ds: Dataset) -> dict[str, Any]:
        """Versions a published dataset with DVC; its metadata entries (the DVC hash)."""
        source = self.storage.path(ds.key) if isinstance(self.storage, LocalStorage) else ds.uri
        return self._dvc().version(source, name=ds.key).metadata()

    def dvc_metadata(self, ds: Dataset, reused: bool = False) -> dict[str, Any]:
        """DVC metadata of a dataset: versioned now, or read back when the dataset was reused."""
        dvc = self._dvc()
        if reused and (dvc.root / f"{ds.key}.dvc").is_file():
            return dvc.read(f"{ds.key}.dvc", pushed=dvc.push).metadata()
        return self.version(ds)

    def dvc_digest(self, ds: Dataset) -> str:
        """The DVC hash recorded for a dataset, else its content hash (models are not in DVC)."""
        dvc = self._dvc()
        if (dvc.root / f"{ds.key}.dvc").is_file():
            return dvc.read(f"{ds.key}.dvc").md5
        return ds.version

    def _dvc(self) -> DvcResource:
        if self.dvc is None:
            raise ValueError("no dvc resource given to this asset's Tools")
        return self.dvc
