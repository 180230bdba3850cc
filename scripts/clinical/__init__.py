"""Layer 5, clinical: the DICOM SEG and measurement SR the bundle writes (``dicom_objects``) and the DICOMweb PACS
round trip (``pacs``). It may import the layers below (``scripts.utils`` to ``scripts.deployment``)."""
