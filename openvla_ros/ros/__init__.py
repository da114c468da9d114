"""The ROS 2 layer: the policy node, the simulated scene node, the recorder, message conversions
and the control-loop pieces the node is built from."""
