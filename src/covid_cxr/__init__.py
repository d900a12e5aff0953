"""covid-cxr: chest X-ray triage classifier (COVID / Normal / Viral Pneumonia)."""

__version__ = "0.1.0"
