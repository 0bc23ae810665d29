"""What mis-serve ships for running it elsewhere: KubeRay manifests (deploy/kuberay/), a Grafana
board (deploy/grafana/) and Prometheus alert rules (deploy/prometheus/), each generated from
code here and checked by tests/test_deploy.py and tests/test_dashboards.py."""
