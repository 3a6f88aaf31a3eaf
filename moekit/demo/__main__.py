"""`python -m moekit.demo`: the README's main job. See moekit/demo/run.py."""

from moekit.demo.run import main

main()
