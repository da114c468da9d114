"""Camera images and small messages decoded straight from their CDR bytes equal rosbags' deserialisation and
rosbags-image's conversion (16-bit, big-endian, compressed included)."""

from __future__ import annotations

import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

from openvla_ros.dataset.cdr import CdrError, compressed_rgb, image_array, image_rgb
from openvla_ros.dataset.cdr_values import DECODERS, decode_value

TYPESTORE = get_typestore(Stores.LATEST)
TYPES = TYPESTORE.types


def _image(encoding: str, pixels: np.ndarray, big_endian: bool = False) -> bytes:
    height, width = pixels.shape[:2]
    data = pixels.astype(pixels.dtype.newbyteorder(">" if big_endian else "<")).tobytes()
    header = TYPES["std_msgs/msg/Header"](stamp=TYPES["builtin_interfaces/msg/Time"](sec=1, nanosec=2),
                                          frame_id="camera_optical")
    message = TYPES["sensor_msgs/msg/Image"](header=header, height=height, width=width, encoding=encoding,
                                             is_bigendian=int(big_endian), step=len(data) // height,
                                             data=np.frombuffer(data, np.uint8))
    return bytes(TYPESTORE.serialize_cdr(message, "sensor_msgs/msg/Image"))


@pytest.mark.parametrize(("encoding", "channels", "dtype", "big_endian"), [
    ("mono16", 1, np.uint16, False), ("mono16", 1, np.uint16, True), ("rgb16", 3, np.uint16, False),
    ("bgra16", 4, np.uint16, False), ("bgr8", 3, np.uint8, False), ("mono8", 1, np.uint8, False),
    ("rgba8", 4, np.uint8, False), ("16UC1", 1, np.uint16, False), ("32FC1", 1, np.float32, False),
])
def test_raw_images_decode_as_rosbags_image_does(encoding: str, channels: int, dtype: type, big_endian: bool) -> None:
    from rosbags.image import message_to_cvimage

    rng = np.random.default_rng(3)
    shape = (37, 53) if channels == 1 else (37, 53, channels)
    if np.issubdtype(dtype, np.integer):
        pixels = rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)
    else:
        pixels = rng.normal(size=shape).astype(dtype)
    data = _image(encoding, pixels, big_endian)
    message = TYPESTORE.deserialize_cdr(data, "sensor_msgs/msg/Image")
    native = image_array(data)
    np.testing.assert_array_equal(native, message_to_cvimage(message))
    assert native.dtype == message_to_cvimage(message).dtype and native.dtype.isnative
    if not encoding[0].isdigit():
        np.testing.assert_array_equal(image_rgb(data), message_to_cvimage(message, "rgb8"))


@pytest.mark.parametrize("extension", [".jpg", ".png"])
def test_compressed_images_decode_as_rosbags_image_does(extension: str) -> None:
    import cv2
    from rosbags.image import message_to_cvimage

    from openvla_ros.dataset.synthetic import make_frame

    ok, encoded = cv2.imencode(extension, make_frame(5, 96, 64)[..., ::-1])
    header = TYPES["std_msgs/msg/Header"](stamp=TYPES["builtin_interfaces/msg/Time"](sec=1, nanosec=2), frame_id="c")
    message = TYPES["sensor_msgs/msg/CompressedImage"](header=header, format=extension[1:], data=encoded.reshape(-1))
    data = bytes(TYPESTORE.serialize_cdr(message, "sensor_msgs/msg/CompressedImage"))
    np.testing.assert_array_equal(compressed_rgb(data), message_to_cvimage(message, "rgb8"))


def test_bad_image_bytes_are_errors_saying_what_is_wrong() -> None:
    data = _image("rgb8", np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(CdrError, match="ends after"):
        image_rgb(data[:-7])
    with pytest.raises(CdrError, match="unsupported image encoding 'yuv422'"):
        image_rgb(_image("yuv422", np.zeros((4, 5, 2), np.uint8)))
    with pytest.raises(CdrError, match="encapsulation"):
        image_rgb(b"\x00\x03\x00\x00" + data[4:])


def _small_messages(big_endian: bool) -> list[tuple[str, object]]:
    header = TYPES["std_msgs/msg/Header"](stamp=TYPES["builtin_interfaces/msg/Time"](sec=3, nanosec=4), frame_id="ee")
    vector = TYPES["geometry_msgs/msg/Vector3"]
    twist = TYPES["geometry_msgs/msg/Twist"](linear=vector(0.1, -0.2, 0.3), angular=vector(1.5, -2.5, 3.5))
    pose = TYPES["geometry_msgs/msg/Pose"](position=TYPES["geometry_msgs/msg/Point"](1.0, 2.0, 3.0),
                                           orientation=TYPES["geometry_msgs/msg/Quaternion"](0.1, 0.2, 0.3, 0.9))
    dims = [TYPES["std_msgs/msg/MultiArrayDimension"](label="xyz", size=7, stride=7)]
    return [
        ("std_msgs/msg/String", TYPES["std_msgs/msg/String"](data="stack the cups")),
        ("std_msgs/msg/Float64", TYPES["std_msgs/msg/Float64"](data=0.25)),
        ("std_msgs/msg/Float32", TYPES["std_msgs/msg/Float32"](data=0.5)),
        ("std_msgs/msg/Float64MultiArray", TYPES["std_msgs/msg/Float64MultiArray"](
            layout=TYPES["std_msgs/msg/MultiArrayLayout"](dim=dims, data_offset=3), data=np.arange(7.0) / 3)),
        ("geometry_msgs/msg/Twist", twist),
        ("geometry_msgs/msg/TwistStamped", TYPES["geometry_msgs/msg/TwistStamped"](header=header, twist=twist)),
        ("geometry_msgs/msg/PoseStamped", TYPES["geometry_msgs/msg/PoseStamped"](header=header, pose=pose)),
        ("sensor_msgs/msg/JointState", TYPES["sensor_msgs/msg/JointState"](
            header=header, name=["a", "bb", "ccc"], position=np.array([0.5, -1.0, 2.0]),
            velocity=np.zeros(3), effort=np.zeros(0))),
    ]


@pytest.mark.parametrize("big_endian", [False, True])
def test_small_messages_decode_as_rosbags_deserialises_them(big_endian: bool) -> None:
    messages = _small_messages(big_endian)
    assert {msgtype for msgtype, _ in messages} == set(DECODERS)
    for msgtype, message in messages:
        data = bytes(TYPESTORE.serialize_cdr(message, msgtype, little_endian=not big_endian))
        back = TYPESTORE.deserialize_cdr(data, msgtype)
        value = decode_value(msgtype, data)
        if msgtype.endswith("JointState"):
            assert value[0] == tuple(back.name)
            np.testing.assert_array_equal(value[1], back.position)
        elif msgtype.endswith("Twist") or msgtype.endswith("TwistStamped"):
            twist = back.twist if msgtype.endswith("Stamped") else back
            np.testing.assert_array_equal(value, [twist.linear.x, twist.linear.y, twist.linear.z,
                                                  twist.angular.x, twist.angular.y, twist.angular.z])
        elif msgtype.endswith("PoseStamped"):
            position, orientation = back.pose.position, back.pose.orientation
            np.testing.assert_array_equal(value, [position.x, position.y, position.z, orientation.x,
                                                  orientation.y, orientation.z, orientation.w])
        elif msgtype.endswith("MultiArray"):
            np.testing.assert_array_equal(value, back.data)
        else:
            assert value == back.data, msgtype
