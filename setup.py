from glob import glob

from setuptools import find_packages, setup

PACKAGE = "openvla_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="openvla_ros maintainers",
    maintainer_email="maintainers@openvla-ros.dev",
    description="OpenVLA vision-language-action policies for ROS 2: act, record, adapt.",
    license="Apache-2.0",
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            "policy_node = openvla_ros.ros.policy_node:main",
            "sim_scene = openvla_ros.ros.sim_scene_node:main",
        ],
    },
)
