"""Pure array ops of Mask R-CNN: boxes, anchors, NMS, matching, RoIAlign, masks. Each module is imported on its own."""
