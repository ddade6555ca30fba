"""Synthetic Cell Painting-like screens, the demo, test and benchmark data of cellfm: what a screen
holds (`catalog`), its cells (`cells`) and stains (`stains`), the microscope (`optics`) and the
writing of plates and manifests (`screens`)."""
