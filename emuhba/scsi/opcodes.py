"""SCSI operation codes, service actions, sense keys and additional sense codes (SPC-4, SBC-3).

Only numbers live here. What a logical unit does with them is in ``miniports.lu``; how sense data
is laid out is in :mod:`emuhba.scsi.sense`.
"""

from __future__ import annotations

from enum import IntEnum


class Op(IntEnum):
    """Operation codes (the first CDB byte). The group code (top three bits) fixes the CDB length."""

    TEST_UNIT_READY = 0x00
    REZERO_UNIT = 0x01
    REQUEST_SENSE = 0x03
    FORMAT_UNIT = 0x04
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    RESERVE_6 = 0x16
    RELEASE_6 = 0x17
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    RECEIVE_DIAGNOSTIC_RESULTS = 0x1C
    SEND_DIAGNOSTIC = 0x1D
    PREVENT_ALLOW = 0x1E  # PREVENT ALLOW MEDIUM REMOVAL
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    WRITE_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    PRE_FETCH_10 = 0x34
    SYNCHRONIZE_CACHE_10 = 0x35
    READ_DEFECT_DATA_10 = 0x37
    WRITE_BUFFER = 0x3B
    READ_BUFFER = 0x3C
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    SANITIZE = 0x48
    LOG_SELECT = 0x4C
    LOG_SENSE = 0x4D
    MODE_SELECT_10 = 0x55
    RESERVE_10 = 0x56
    RELEASE_10 = 0x57
    MODE_SENSE_10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    VARIABLE_LENGTH = 0x7F
    EXTENDED_COPY = 0x83
    RECEIVE_COPY_RESULTS = 0x84
    ATA_PASS_THROUGH_16 = 0x85
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    WRITE_16 = 0x8A
    ORWRITE_16 = 0x8B
    WRITE_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    PRE_FETCH_16 = 0x90
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    WRITE_ATOMIC_16 = 0x9C
    SERVICE_ACTION_IN_16 = 0x9E
    SERVICE_ACTION_OUT_16 = 0x9F
    REPORT_LUNS = 0xA0
    ATA_PASS_THROUGH_12 = 0xA1
    SECURITY_PROTOCOL_IN = 0xA2
    MAINTENANCE_IN = 0xA3
    MAINTENANCE_OUT = 0xA4
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    WRITE_VERIFY_12 = 0xAE
    VERIFY_12 = 0xAF
    SECURITY_PROTOCOL_OUT = 0xB5
    READ_DEFECT_DATA_12 = 0xB7


class ServiceActionIn16(IntEnum):
    """Service actions of SERVICE ACTION IN(16) (opcode 9Eh)."""

    READ_CAPACITY_16 = 0x10
    GET_LBA_STATUS = 0x12


class MaintenanceIn(IntEnum):
    """Service actions of MAINTENANCE IN (opcode A3h)."""

    REPORT_IDENTIFYING_INFORMATION = 0x05
    REPORT_TARGET_PORT_GROUPS = 0x0A
    REPORT_SUPPORTED_OPERATION_CODES = 0x0C
    REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS = 0x0D
    REPORT_TIMESTAMP = 0x0F


# Opcodes whose CDB carries a service action field (byte 1, bits 4-0); REPORT SUPPORTED
# OPERATION CODES must tell these apart from plain opcodes.
SERVICE_ACTION_OPCODES = frozenset(
    {
        Op.PERSISTENT_RESERVE_IN,
        Op.PERSISTENT_RESERVE_OUT,
        Op.VARIABLE_LENGTH,
        Op.EXTENDED_COPY,
        Op.RECEIVE_COPY_RESULTS,
        Op.SERVICE_ACTION_IN_16,
        Op.SERVICE_ACTION_OUT_16,
        Op.MAINTENANCE_IN,
        Op.MAINTENANCE_OUT,
    }
)


def cdb_length_for_group(opcode: int) -> int:
    """CDB length fixed by the opcode's group code; 0 when the group does not fix it.

    Group 3 is reserved except 7Fh (variable length, at least 8 bytes); groups 6 and 7 are
    vendor specific.
    """
    group = opcode >> 5
    if group == 0:
        return 6
    if group in (1, 2):
        return 10
    if group == 4:
        return 16
    if group == 5:
        return 12
    if opcode == Op.VARIABLE_LENGTH:
        return 8
    return 0


class SenseKey(IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE
    COMPLETED = 0xF


# Additional sense code / qualifier pairs (SPC-4 Annex D), as (ASC, ASCQ).
ASC_NO_ADDITIONAL_SENSE = (0x00, 0x00)
ASC_LU_NOT_READY_CAUSE_NOT_REPORTABLE = (0x04, 0x00)
ASC_LU_NOT_READY_BECOMING_READY = (0x04, 0x01)
ASC_LU_NOT_READY_INITIALIZING_COMMAND_REQUIRED = (0x04, 0x02)
ASC_LU_NOT_READY_MANUAL_INTERVENTION_REQUIRED = (0x04, 0x03)
ASC_LU_COMMUNICATION_FAILURE = (0x08, 0x00)
ASC_WRITE_ERROR = (0x0C, 0x00)
ASC_INVALID_FIELD_IN_INFORMATION_UNIT = (0x0E, 0x03)
ASC_UNRECOVERED_READ_ERROR = (0x11, 0x00)
ASC_PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
ASC_MISCOMPARE_DURING_VERIFY = (0x1D, 0x00)
ASC_INVALID_COMMAND_OPERATION_CODE = (0x20, 0x00)
ASC_LBA_OUT_OF_RANGE = (0x21, 0x00)
ASC_INVALID_FIELD_IN_CDB = (0x24, 0x00)
ASC_LOGICAL_UNIT_NOT_SUPPORTED = (0x25, 0x00)
ASC_INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
ASC_WRITE_PROTECTED = (0x27, 0x00)
ASC_POWER_ON_RESET_OR_BUS_DEVICE_RESET = (0x29, 0x00)
ASC_POWER_ON_OCCURRED = (0x29, 0x01)
ASC_SCSI_BUS_RESET_OCCURRED = (0x29, 0x02)
ASC_BUS_DEVICE_RESET_FUNCTION_OCCURRED = (0x29, 0x03)
ASC_DEVICE_INTERNAL_RESET = (0x29, 0x04)
ASC_I_T_NEXUS_LOSS_OCCURRED = (0x29, 0x07)
ASC_MODE_PARAMETERS_CHANGED = (0x2A, 0x01)
ASC_CAPACITY_DATA_HAS_CHANGED = (0x2A, 0x09)
ASC_COMMANDS_CLEARED_BY_ANOTHER_INITIATOR = (0x2F, 0x00)
ASC_SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)
ASC_MEDIUM_NOT_PRESENT = (0x3A, 0x00)
ASC_INQUIRY_DATA_HAS_CHANGED = (0x3F, 0x03)
ASC_REPORTED_LUNS_DATA_HAS_CHANGED = (0x3F, 0x0E)
ASC_INTERNAL_TARGET_FAILURE = (0x44, 0x00)
ASC_OVERLAPPED_COMMANDS_ATTEMPTED = (0x4E, 0x00)


# Peripheral device type of a direct-access block device (SBC), INQUIRY byte 0.
PERIPHERAL_DIRECT_ACCESS_BLOCK = 0x00

# Version descriptors claimed in standard INQUIRY data (SPC-4 table "Version descriptor values").
VERSION_SAM_5 = 0x00A0
VERSION_SPC_4 = 0x0460
VERSION_SBC_3 = 0x04C0
VERSION_ISCSI = 0x0960
