from tests.fakenvml import fake_nvml, fake_nvml_library

__all__ = ["fake_nvml", "fake_nvml_library"]
