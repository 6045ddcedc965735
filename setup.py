"""Package layout that pyproject.toml cannot express; all metadata lives in pyproject.toml.

The tuned configurations sit at the repository root (tuned_configs/, where the sweep writes them),
but must ship inside the installed package. Mapping the folder to the package
gsa_kernels.tuned_configs copies its YAML files into a regular install as gsa_kernels/tuned_configs/,
with no symlink and no second copy in git; an editable install reads the repository folder instead
(gsa_kernels/_paths.py looks in both places). pyproject's `packages.find` cannot add a renamed
package next to the discovered ones, hence this file.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["gsa_kernels", "gsa_kernels.*", "reference", "reference.*",
                                    "tuning", "tuning.*"]) + ["gsa_kernels.tuned_configs"],
    package_dir={"gsa_kernels.tuned_configs": "tuned_configs"},
    package_data={"gsa_kernels.tuned_configs": ["*.yaml"]},
)
