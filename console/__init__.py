"""The review console (`tumorflow ui`): the gate's evidence in a browser, signed-in decisions."""
